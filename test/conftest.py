# The model scripts under test/models are command-line programs, not pytest tests: keep pytest out.
collect_ignore_glob = ["models/*"]

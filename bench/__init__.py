"""The benchmarks, as one command: `python -m bench <serve|routing|startup|costs|lora|structured|report|phases>`.

One module per subcommand (serve.py, routing.py, ...), sharing cli.py's argument groups,
datasets.py's workloads, loadgen.py and chat_load.py's load generators and report/'s writer; the
servers come from the harness package. Results go to bench/results/<date>-<subcommand>/.
bench/README.md says what each subcommand measures and how to run it.
"""

"""The Hydra configs of ``ham_rl.train`` (``config.yaml`` and the groups ``env/``, ``memory/``, ``agent/``), shipped in
the package so they are found wherever it is installed (``pkg://ham_rl.configs``)."""

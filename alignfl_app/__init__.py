"""ALIGN-FL's core, free of Flower messages.

``contract`` (what silo and server exchange), ``silo`` (a silo's side), ``server`` (the server's side),
``privacy`` (DP-SGD, accounting, the silo's policy and ledger), ``models`` (generators and the global model),
``data`` (datasets and silo partitions), ``audit`` (outlier and canary audits), ``tools`` (the ``alignfl``
commands); ``config`` holds every config surface.
"""

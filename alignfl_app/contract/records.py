"""Names of the records exchanged between ServerApp and ClientApp (one place, both sides import it).

Train reply:    ``decoder`` (ArrayRecord, decoder tensors only), ``descriptor`` (ConfigRecord, key
                ``json``: a GeneratorDescriptor), ``metrics`` (MetricRecord: replies.train_metrics_schema);
                or an error reply (code 4031) when the silo's privacy policy or ledger refuses.
FedAvg/FedProx train ask: ``global-model`` (ArrayRecord), ``config`` (``strategy``, ``proximal-mu``);
                reply: ``global-model`` (the locally trained model), ``metrics``, ``silo``.
Evaluate ask:   ``global-model`` (ArrayRecord), ``config`` (ConfigRecord with ``global-model-kind``).
Evaluate reply: ``metrics`` (MetricRecord), ``silo``; none is asked for in a DP run, and a DP silo refuses.
"""

DECODER = "decoder"
DESCRIPTOR = "descriptor"
DESCRIPTOR_JSON = "json"
METRICS = "metrics"
CONFIG = "config"
GLOBAL_MODEL = "global-model"
GLOBAL_MODEL_KIND = "global-model-kind"
SERVER_ROUND = "server-round"
SILO = "silo"  # ConfigRecord {"name": silo name}
STRATEGY = "strategy"  # train ask config: alignfl | fedavg | fedprox (absent: alignfl)
PROXIMAL_MU = "proximal-mu"  # train ask config of FedProx (Flower's FedProx sets it)
PRIVACY_REFUSAL_ERROR = 4031  # error reply code: the silo's privacy policy or ledger refused the request
PRIVATE_FAILURE_ERROR = 4032  # error reply code: a private round failed; the reason stays on the silo
STRATEGY_MISMATCH_ERROR = 4033  # error reply code: the message asks for another strategy than the run config
SILO_DATA_ERROR = 4034  # error reply code: the silo's data or its own config cannot serve the run (one line)

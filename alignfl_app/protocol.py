"""Names of the records exchanged between ServerApp and ClientApp (one place, both sides import it).

Train reply:    ``decoder`` (ArrayRecord, decoder tensors only), ``descriptor`` (ConfigRecord, key
                ``json``: a GeneratorDescriptor), ``metrics`` (MetricRecord).
FedAvg/FedProx train ask: ``global-model`` (ArrayRecord), ``config`` (``strategy``, ``proximal-mu``);
                reply: ``global-model`` (the locally trained model), ``metrics``, ``silo``.
Evaluate ask:   ``global-model`` (ArrayRecord), ``config`` (ConfigRecord with ``global-model-kind``).
Evaluate reply: ``metrics`` (MetricRecord), ``silo``.
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
VAE_STATE = "alignfl-vae"  # key in the silo's private Context.state; never sent

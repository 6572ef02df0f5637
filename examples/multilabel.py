"""Multi-label classification: an MLP predicts 5 labels at once (multi-hot, sigmoid outputs,
binary cross-entropy). Metrics: per-label accuracy and exact match.

    python examples/multilabel.py build      # rebuild the bundle (needs TensorFlow: fededge[convert])
    python examples/multilabel.py demo       # = fededge demo --example multilabel (no TensorFlow)
    python examples/multilabel.py compare    # federated vs centralised, same model and data

The Keras model and the data are in fededge/demo_examples.py (runner: fededge/demo_compare.py);
the prebuilt bundle ships in
fededge/models/multilabel/.
"""

import sys

from fededge.demo_compare import main

if __name__ == "__main__":
    sys.exit(main("multilabel", sys.argv[1:]))

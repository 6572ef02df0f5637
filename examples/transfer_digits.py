"""Transfer learning: a conv feature extractor pretrained on digits 0-4 is frozen into the graph;
the fleet trains only the Dense head on all ten digits, so only the head's weights travel.

    python examples/transfer_digits.py build      # rebuild the bundle (needs TensorFlow: fededge[convert])
    python examples/transfer_digits.py demo       # = fededge demo --example transfer_digits (no TensorFlow)
    python examples/transfer_digits.py compare    # federated vs centralised, same model and data

The Keras model and the data are in fededge/demo_examples.py (runner: fededge/demo_compare.py);
the prebuilt bundle ships in
fededge/models/transfer_digits/.
"""

import sys

from fededge.demo_compare import main

if __name__ == "__main__":
    sys.exit(main("transfer_digits", sys.argv[1:]))

"""Regression on scikit-learn's diabetes data: an MLP predicts disease progression from 10 raw
clinical features (standardised inside the graph, so apps send raw values). Metric: MSE.

    python examples/diabetes_regression.py build      # rebuild the bundle (needs TensorFlow: fededge[convert])
    python examples/diabetes_regression.py demo       # = fededge demo --example diabetes_regression (no TensorFlow)
    python examples/diabetes_regression.py compare    # federated vs centralised, same model and data

The Keras model and the data are in fededge/demo_examples.py (runner: fededge/demo_compare.py);
the prebuilt bundle ships in
fededge/models/diabetes_regression/.
"""

import sys

from fededge.demo_compare import main

if __name__ == "__main__":
    sys.exit(main("diabetes_regression", sys.argv[1:]))

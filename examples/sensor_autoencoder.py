"""Anomaly detection on sensor traces: a 1-D conv autoencoder learns to reconstruct normal
vibration traces (regression with the input as target, MSE); the reconstruction error scores
anomalies (detection AUC on a test set with 10% anomalies).

    python examples/sensor_autoencoder.py build      # rebuild the bundle (needs TensorFlow: fededge[convert])
    python examples/sensor_autoencoder.py demo       # = fededge demo --example sensor_autoencoder (no TensorFlow)
    python examples/sensor_autoencoder.py compare    # federated vs centralised, same model and data

The Keras model and the data are in fededge/demo_examples.py (runner: fededge/demo_compare.py);
the prebuilt bundle ships in
fededge/models/sensor_autoencoder/.
"""

import sys

from fededge.demo_compare import main

if __name__ == "__main__":
    sys.exit(main("sensor_autoencoder", sys.argv[1:]))

"""The model and its training: configs, the MAGNET network, loss, patient graphs, training, metrics, personalization."""

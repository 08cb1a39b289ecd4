"""One package per analysis method (M1-M5); each plugs its networks, training task and predictor into the shared engines."""

import os

# Quiet TensorFlow's C++ start-up logs here and in Beam's worker processes.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

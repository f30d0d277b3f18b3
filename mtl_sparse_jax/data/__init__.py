"""Data: the on-disk contract (`spec`: feature specs, manifest, validation), the tf.data input pipeline
(`pipeline`, the only module that imports TensorFlow, lazily; `tfds_source` feeds it from tfds dataset
directories) and PyTorch-exact resizes (`resize`), whose index maps `data_prep` shares. Importing this package imports neither TensorFlow nor `data_prep`."""

"""Data: corpora → token contexts (`corpus`), activations harvested to disk (`harvest`), read
back (`activation_store`), and the trainer's batches (`batches`)."""

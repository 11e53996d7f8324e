"""Running and compiling the Kubeflow pipeline."""

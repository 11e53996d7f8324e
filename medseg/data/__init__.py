"""Data sources and data versioning.

* :mod:`medseg.data.s3`: an S3 client from the environment, verified atomic downloads of a prefix, and
  :func:`~medseg.data.s3.stage_source` (a local folder for ``--source DIR | s3://bucket/prefix``).
* :mod:`medseg.data.dvc_remote`: the DVC remote on S3 (configure, push, pull) and the dataset version.

Nothing heavy is imported here: boto3 and DVC load when a function needs them.
"""

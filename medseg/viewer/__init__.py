"""A small web viewer for people: upload a case, see the model's answer (a segmentation slice by slice, a 2D
slice's mask, or a classifier's probabilities); the upload fields come from the model server's metadata.

``medseg viewer --url http://127.0.0.1:8080 --model NAME --port 8090`` serves one page on 127.0.0.1 (plain
HTML, a little JavaScript, no external assets). The viewer calls the model server with the Open Inference
Protocol v2 (:mod:`medseg.serving.client`), then draws axial slices server-side as PNG (:mod:`.render`)
with the labels over the chosen channel, a legend with the volumes in ml and the model version, and offers
the segmentation (``.nii.gz``, in the input's geometry) for download. See :mod:`.app` for the routes.

This module stays light: ``medseg --help`` imports :mod:`.cli` only.
"""

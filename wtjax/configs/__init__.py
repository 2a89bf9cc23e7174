"""The run configs shipped with the package (``get_config(arg)`` in each file).

The job takes one by path (``--config=configs/cifar_resnet.py`` in a checkout, where ``configs`` links
here) or by name from anywhere (``--config=cifar_resnet:width=32``, :func:`wtjax.job.config.resolve_config`).
"""

"""This machine's side of a running cluster, whatever its plugins are: a client for it
(:func:`~globular.client.connect.connect`, through the plugin that started one) and a shell
on its nodes (:mod:`globular.client.nodeshell`).

ipyparallel's own client side (``globular.Client``, the JupyterLab panel's cluster class) is
the ipcluster plugin's: :mod:`globular.ipcluster.client` and
:mod:`globular.ipcluster.labcluster`, reached from here through the plugin registry.
"""

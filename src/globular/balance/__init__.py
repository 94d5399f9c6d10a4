"""The balancer (``globular loadbalance``): a cluster that follows its work.

:mod:`.policy` decides (pure logic); :mod:`.balancer` polls the plugin's view of the work
(:meth:`globular.plugins.base.Plugin.load_watcher`: ipcluster asks its controller) and changes
the desired node set through the same operations as ``addnode`` and ``removenode``.  The
balancer decides *nodes*; ipyparallel still places every task.
"""

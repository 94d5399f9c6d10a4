"""IPython parallel on the cluster: the ipcluster plugins (see plugin.py) and what they need."""

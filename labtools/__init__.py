"""labtools: data-parallel SqueezeNet v1.1 / CIFAR-10 training on MPI clusters, driven from notebooks.

Entry points: ``labtools.train.run(RunConfig(...))`` on every MPI process (``mpiexec -n P labtools
train``), ``labtools.cluster.Pool`` for ipyparallel MPI engines, ``labtools reproduce`` for papermill.
"""
__version__ = "0.1.0"

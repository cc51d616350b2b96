"""autobatch's command line: the one place that joins the optimizer to the model families.

The optimizer knows a model only as a `TunableModel`; `deployments` provides the model families;
this package, a layer above both, picks a family by name and hands it to the optimizer (and adds
the commands that other packages register, such as serve's `config`). Its `client` package
(autobatch/client/) holds the HTTP and OIP clients, the load generator and `autobatch bench`.
"""

"""devstack's composition root: the ``devstack`` command, which wires the router (data plane), the
controller and its sources (control plane) and the demo together. Nothing below this package
imports it; it is the only place where the two planes meet."""

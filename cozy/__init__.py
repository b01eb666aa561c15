"""The `cozy` command: the composition root that wires the relay and the client kit together.

It is the only package that imports both sides; `relay` never imports `clientkit` and vice versa.
"""

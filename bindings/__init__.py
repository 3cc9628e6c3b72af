"""Framework bindings of bitempered: validation, backend dispatch and autograd rules."""

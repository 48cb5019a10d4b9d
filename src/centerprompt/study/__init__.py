"""Studies of the method: the leave-one-center-out experiment, whether the decoder reads the
transformer (reliance) and where an adapter's change goes (diagnostic), intervals, the report."""

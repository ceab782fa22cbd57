"""devstack propagation SDK: carries the routing key (W3C baggage) and trace context across hops."""

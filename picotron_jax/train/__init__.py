"""Train state, optimizer factory, loss and the jitted step."""

"""The stage seam: the consumer loop, dispositions, byte budgets and the service runner."""

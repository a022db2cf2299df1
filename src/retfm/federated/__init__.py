"""Federation: Flower apps and simulation, where only weights and aggregate metrics travel."""

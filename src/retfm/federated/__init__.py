"""Federation: Flower apps and simulation, where only weights and aggregate metrics travel; and ``share``,
encrypted and signed bundles of a de-identified ingest for sites that upload images."""

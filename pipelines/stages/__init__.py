"""One module per stage; ``pipelines.registry`` lists them in running order."""

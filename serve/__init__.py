"""Ray Serve integration: the batched deployment (deployment.py), the app builder (app.py, `serve.app:build`),
autobatch metrics (metrics.py) and test-only fault hooks (faults.py). optimizer/ and deployments/ never import this."""

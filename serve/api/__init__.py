"""What a replica answers, behind its deployment (serve/cluster/deployment.py):

  routes.py         the simple HTTP routes: GET / and /tuning, POST /profile, POST / (one sample)
  tensor_routes.py  the replica's side of the Open Inference Protocol (many samples, by handle)
  openai_api.py     the OpenAI-compatible API: the router's half (route) and the replica's (OpenAIServing)
  calls.py          a call from an ingress (the OIP router, the OpenAI API) to a replica by handle
  costs.py          what a request costs a replica's memory before it is decoded, and giving it back
  profiling.py      POST /profile's torch.profiler capture of the replica serving, or of its tuning probe

Every route turns one request into one batcher Entry and calls Replica.submit (serve/replica/).
Imports serve/replica/ and no other part of serve/; Ray only in calls.py: tests/test_layering.py."""

"""The clients of a served autobatch app: they speak HTTP and gRPC to it and import nothing of the
server (serve/) nor Ray, so they run anywhere (tests/test_layering.py checks it).

  http_client.py    Client / AsyncClient for the simple routes (POST /<route>, GET /<route>/tuning)
  oip_client.py     V2Client: the Open Inference Protocol over HTTP or gRPC (its wire forms: wire/)
  load.py           the load generator: a bounded closed- or open-loop run and its statistics
  load_processes.py run_load: one load in this process, or split between forked processes
  command.py        `autobatch client`; oip_commands.py its --protocol v2 side (and bench's)
  bench.py          `autobatch bench`: payloads, the run, the report and its verdict

Imports go one way: command and bench -> oip_commands -> oip_client, load -> http_client.
"""

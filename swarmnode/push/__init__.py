"""`swarmnode push`: signed, content-addressed releases rolled out peer-to-peer with canaries."""

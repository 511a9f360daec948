"""The devices over the network: sessions and admission, probing, the local-fleet launcher, TLS."""

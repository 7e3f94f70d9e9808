"""Datasets and corpora: the synthetic world, real-file loaders, shared record types."""

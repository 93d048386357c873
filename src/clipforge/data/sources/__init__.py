"""One module per offline dataset: how to install, read and prepare it (see clipforge.data.offline)."""

"""Gentoo Portage on a node: finding it (`host`), the build-environment fingerprint
(`fingerprint`), the plan of an emerge with Portage's own dependency edges (`graph`) and the
binary package host (`binhost`)."""

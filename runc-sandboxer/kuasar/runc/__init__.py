"""runc-sandboxer: pods as Linux namespaces + cgroups, containers run by runc."""

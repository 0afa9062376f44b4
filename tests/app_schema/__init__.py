"""A test application with tenant tables of its own, built on tenantdb."""

"""The database: schema, migrations and every query. The only place that knows table names."""

"""The operator console: server-rendered pages (Jinja2) with a small vendored script layer (htmx and
its SSE extension), calling the same ``CommandService`` as MQTT, HTTP and the CLI."""

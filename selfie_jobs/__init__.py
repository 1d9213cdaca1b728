"""The job domain shared by the api and the workers: settings, models, states, queries and the queue contract."""

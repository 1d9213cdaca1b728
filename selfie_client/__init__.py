"""A small Python client for the SelfIE service, for notebooks and scripts.

    from selfie_client import Client
    df = Client("http://127.0.0.1:8000").interpret("The Eiffel Tower is in Paris.", layers=range(0, 31, 5), tokens=[-3, -2, -1])
"""

from selfie_client.client import Client, SelfieError, ServiceUnreachable
from selfie_client.edits import state_ref
from selfie_client.tables import layer_token_table

__all__ = ["Client", "SelfieError", "ServiceUnreachable", "layer_token_table", "state_ref"]

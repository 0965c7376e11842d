"""The one home of the world-model Serve application's and deployment's names.

Kept import-free so that configs, the client and the policies can name the app without
importing Ray Serve.
"""

APP_NAME = "world_model"
"""The Ray Serve application serving the world model."""
DEPLOYMENT_NAME = "WorldModelDeployment"
"""Its deployment (the replica class's Serve name)."""

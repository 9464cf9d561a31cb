"""``truffula cluster``: truffula replicas as a Ray Serve application.

``routing.py`` reads a request's adapter (no Ray needed); ``replica.py`` is one replica (an
engine process and the server's FastAPI app, called in-process); ``app.py`` the router in front
of them and the application; ``launch.py`` starts or joins Ray, deploys, waits and stops. Ray is
imported only by the last three (``pip install 'truffula[cluster]'``).
"""

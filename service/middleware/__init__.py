"""The HTTP guard: single-purpose ASGI middlewares driven by a per-route policy table (see ``guard``)."""

from service.middleware.admission import OpenRequests
from service.middleware.bento_errors import rest_api
from service.middleware.exchange import error_response_parts
from service.middleware.guard import GuardMiddleware
from service.middleware.policy import API_ROUTES, UNLIMITED_PATHS, RoutePolicy, policy_for
from service.middleware.watch import ANSWER_GRACE_S

__all__ = ["ANSWER_GRACE_S", "API_ROUTES", "UNLIMITED_PATHS", "GuardMiddleware", "OpenRequests", "RoutePolicy",
           "error_response_parts", "policy_for", "rest_api"]

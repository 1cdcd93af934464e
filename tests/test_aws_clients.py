"""The shared boto3 session's lean loader: what it drops, and that clients still resolve endpoints."""

from types import SimpleNamespace

from shipper.outputs import aws


def test_drop_documentation_empties_every_documentation_entry_and_keeps_the_rest():
    model = {"documentation": "<p>long</p>", "shapes": {"Bucket": {"type": "string", "documentation": "x"},
                                                        "List": {"type": "list", "member": {"shape": "Bucket",
                                                                                            "documentation": "y"}}},
             "operations": [{"name": "PutObject", "documentationUrl": "https://docs"}]}
    aws.drop_documentation(model)
    aws.drop_documentation(model)  # idempotent: the loader's cache hands the same dict out again
    assert model == {"documentation": "", "shapes": {"Bucket": {"type": "string", "documentation": ""},
                                                     "List": {"type": "list", "member": {"shape": "Bucket",
                                                                                         "documentation": ""}}},
                     "operations": [{"name": "PutObject", "documentationUrl": ""}]}


def test_keep_endpoint_services_drops_other_services_in_every_partition():
    endpoints = {"partitions": [{"partition": "aws", "services": {"s3": {"endpoints": {}}, "ec2": {}, "logs": {}}},
                                {"partition": "aws-cn", "services": {"glacier": {}}}]}
    aws.keep_endpoint_services(endpoints, frozenset({"s3", "logs"}))
    assert endpoints == {"partitions": [{"partition": "aws", "services": {"s3": {"endpoints": {}}, "logs": {}}},
                                        {"partition": "aws-cn", "services": {}}]}


def test_clients_from_the_lean_session_resolve_real_endpoints_without_the_dropped_data():
    settings = SimpleNamespace(region="eu-west-1", endpoint_url="", where="outputs[0]")
    s3 = aws.make_client("s3", settings, {}, attempts=1, connections=1)
    logs = aws.make_client("logs", settings, {}, attempts=1, connections=1)
    sqs = aws.make_client("sqs", settings, {}, attempts=1, connections=1)  # not kept: the partition default
    assert s3.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert logs.meta.endpoint_url == "https://logs.eu-west-1.amazonaws.com"
    assert sqs.meta.endpoint_url == "https://sqs.eu-west-1.amazonaws.com"
    loader = aws._session()._session.get_component("data_loader")
    kept = set(loader.load_data("endpoints")["partitions"][0]["services"])  # the resolver's (cached) copy
    assert kept <= aws.ENDPOINT_SERVICES and {"s3", "logs"} <= kept
    operation = s3.meta.service_model.operation_model("PutObject")
    assert operation.documentation == "" and operation.input_shape.members["Bucket"].documentation == ""

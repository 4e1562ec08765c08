package client

import "google.golang.org/grpc"

// roundRobinConfig is the gRPC service config that WithRoundRobin sets.
const roundRobinConfig = `{"loadBalancingConfig":[{"round_robin":{}}]}`

// WithRoundRobin spreads calls and streams over every address the target
// resolves to, in turn, instead of gRPC's default of using the first one
// that works. qbridge instances are stateless peers over one Redis, so any of
// them may serve any call. Addresses that stop working are skipped until
// they come back; a stream on an instance that stops ends (UNAVAILABLE, so a
// Worker reopens it on another one).
//
// It sets the default service config {"loadBalancingConfig":[{"round_robin":{}}]}
// (grpc.WithDefaultServiceConfig), which a service config from the name
// resolver overrides. It only helps when the target resolves to several
// addresses: "dns:///qbridge.internal:7070" (every A/AAAA record, looked up
// again when connections fail), or a static list through a resolver such as
// google.golang.org/grpc/resolver/manual. A bare "host:port" uses the
// passthrough resolver, which gives exactly one address:
//
//	r := manual.NewBuilderWithScheme("qbridge")
//	r.InitialState(resolver.State{Addresses: []resolver.Address{
//		{Addr: "10.0.0.1:7070"}, {Addr: "10.0.0.2:7070"}, {Addr: "10.0.0.3:7070"},
//	}})
//	c, err := client.Dial("qbridge:///instances", client.WithRoundRobin(),
//		client.WithDialOptions(grpc.WithResolvers(r)))
func WithRoundRobin() Option {
	return func(c *dialConfig) {
		c.extra = append(c.extra, grpc.WithDefaultServiceConfig(roundRobinConfig))
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sort"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	configv1 "gohost/pb/spire/service/common/config/v1"
	initv1 "gohost/pb/spire/service/private/init/v1"
)

// Handshake values SPIRE uses for every external plugin: protocol version 1, and the plugin type
// name as both the magic cookie key and value.
const (
	pluginType            = "UpstreamAuthority"
	handshakeVersion      = 1
	upstreamAuthorityName = "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority"
	configServiceName     = "spire.service.common.config.v1.Config"
)

// hostServiceBrokerID is the broker service id on which SPIRE serves its host services to plugins.
const hostServiceBrokerID = 1

// spireHostServiceNames are the host service names SPIRE's server lists in InitRequest.
// NOTE: the broker server in this host does not implement them. An UpstreamAuthority has no use
// for them, so a plugin that dials one of them gets UNIMPLEMENTED here.
var spireHostServiceNames = []string{
	"spire.hostservice.server.agentstore.v1.AgentStore",
	"spire.hostservice.server.identityprovider.v1.IdentityProvider",
	"spire.hostservice.common.metrics.v1.Metrics",
}

// brokerProbeWait is how long the extra broker stream must stay open without an error.
const brokerProbeWait = time.Second

// deinitTimeout matches the time limit SPIRE gives Deinit when it unloads a plugin.
const deinitTimeout = 10 * time.Second

// upstreamAuthorityPlugin is the go-plugin client side of the plugin. Its GRPCClient keeps the
// connection and the broker, which the session then uses for raw SPIRE calls.
type upstreamAuthorityPlugin struct {
	plugin.NetRPCUnsupportedPlugin
}

type pluginConnection struct {
	conn   *grpc.ClientConn
	broker *plugin.GRPCBroker
}

func (upstreamAuthorityPlugin) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("gohost only loads plugins and cannot serve one")
}

func (upstreamAuthorityPlugin) GRPCClient(_ context.Context, broker *plugin.GRPCBroker, conn *grpc.ClientConn) (interface{}, error) {
	return &pluginConnection{conn: conn, broker: broker}, nil
}

// pluginSession is one loaded plugin process with its host-service server on the broker.
type pluginSession struct {
	client     *plugin.Client
	conn       *grpc.ClientConn
	hostServer *grpc.Server
}

// startPlugin launches the plugin, reads its handshake line, dispenses the plugin and accepts the
// host-service broker id as SPIRE does right after dispensing.
func startPlugin(ctx context.Context, opts options) (*pluginSession, error) {
	cmd := exec.Command(opts.pluginPath)
	// SPIRE makes the kernel kill the plugin when the host dies, so a crashed host leaves no
	// plugin behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	startTimeout := time.Minute
	if deadline, ok := ctx.Deadline(); ok {
		startTimeout = time.Until(deadline)
	}

	logger := hclog.New(&hclog.LoggerOptions{
		Name:   "gohost",
		Output: os.Stderr,
		Level:  hclog.LevelFromString(opts.logLevel),
	})

	// NOTE: Debian 12 ships go-plugin 1.0.1, while SPIRE pins 1.8.0. Version 1.8.0 also opens
	// plugin.GRPCStdio/StreamStdio, which this host does not, and it only logs a failure of that stream.
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig: plugin.HandshakeConfig{
			ProtocolVersion:  handshakeVersion,
			MagicCookieKey:   pluginType,
			MagicCookieValue: pluginType,
		},
		Plugins:          map[string]plugin.Plugin{pluginType: upstreamAuthorityPlugin{}},
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         false,
		Managed:          true,
		StartTimeout:     startTimeout,
		Logger:           logger,
	})

	rpcClient, err := client.Client()
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("starting plugin %s and reading its go-plugin handshake: %w", opts.pluginPath, err)
	}
	if client.Protocol() != plugin.ProtocolGRPC {
		client.Kill()
		return nil, fmt.Errorf("plugin negotiated protocol %q; SPIRE allows only %q", client.Protocol(), plugin.ProtocolGRPC)
	}

	raw, err := rpcClient.Dispense(pluginType)
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("dispensing the plugin: %w", err)
	}
	connection := raw.(*pluginConnection)

	listener, err := connection.broker.Accept(hostServiceBrokerID)
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("announcing broker service id %d on the plugin's broker stream: %w", hostServiceBrokerID, err)
	}
	hostServer := grpc.NewServer()
	grpc_health_v1.RegisterHealthServer(hostServer, health.NewServer())
	go func() {
		if err := hostServer.Serve(listener); err != nil {
			logger.Error("host-service broker server stopped", "error", err)
		}
	}()

	return &pluginSession{client: client, conn: connection.conn, hostServer: hostServer}, nil
}

// stop shuts the plugin down through go-plugin (GRPCController/Shutdown, then a kill after a
// grace period) and stops the broker server.
func (s *pluginSession) stop() {
	s.client.Kill()
	s.hostServer.Stop()
}

// probeBrokerStream opens a second plugin.GRPCBroker/StartStream call and checks that the plugin
// keeps it open. go-plugin's own broker stream hides such a failure, because its Accept can still
// succeed when the plugin responds to the stream with UNIMPLEMENTED, depending on timing.
func (s *pluginSession) probeBrokerStream(ctx context.Context) error {
	probeCtx, cancel := context.WithTimeout(ctx, brokerProbeWait)
	defer cancel()

	desc := &grpc.StreamDesc{StreamName: "StartStream", ClientStreams: true, ServerStreams: true}
	stream, err := s.conn.NewStream(probeCtx, desc, "/plugin.GRPCBroker/StartStream")
	if err != nil {
		return fmt.Errorf("opening plugin.GRPCBroker/StartStream: %w", err)
	}

	// The plugin has no reason to send anything, so the read is expected to time out. The
	// message type only has to accept a ConnInfo as unknown fields.
	err = stream.RecvMsg(&emptypb.Empty{})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, io.EOF):
		return errors.New("plugin.GRPCBroker/StartStream: the plugin ended the broker stream right away, so go-plugin's broker closes and SPIRE cannot announce its host services")
	case status.Code(err) == codes.DeadlineExceeded && probeCtx.Err() != nil && ctx.Err() == nil:
		return nil
	default:
		return fmt.Errorf("plugin.GRPCBroker/StartStream failed, but SPIRE's broker needs this stream: %w", err)
	}
}

// checkHealth calls grpc.health.v1.Health/Check for the service "plugin", as go-plugin's Ping does.
// SPIRE does not call it, so the result is reported rather than enforced.
func (s *pluginSession) checkHealth(ctx context.Context) string {
	callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()

	response, err := grpc_health_v1.NewHealthClient(s.conn).Check(callCtx, &grpc_health_v1.HealthCheckRequest{Service: plugin.GRPCServiceName})
	if err != nil {
		fmt.Fprintf(os.Stderr, "gohost: warning: health check for service %q failed: %v\n", plugin.GRPCServiceName, err)
		return "unavailable"
	}
	return response.GetStatus().String()
}

// initPlugin calls Init with SPIRE's host service names and checks that the plugin advertises the
// UpstreamAuthority and Config services. SPIRE fails the load without the first, and rejects
// plugin_data without the second.
func (s *pluginSession) initPlugin(ctx context.Context) ([]string, error) {
	response, err := initv1.NewInitClient(s.conn).Init(ctx, &initv1.InitRequest{HostServiceNames: spireHostServiceNames})
	if err != nil {
		return nil, fmt.Errorf("Init/Init failed: %w", err)
	}

	names := append([]string(nil), response.GetPluginServiceNames()...)
	sort.Strings(names)
	for _, required := range []string{upstreamAuthorityName, configServiceName} {
		if !containsString(names, required) {
			return nil, fmt.Errorf("Init/Init: plugin_service_names %q does not list %s", names, required)
		}
	}
	return names, nil
}

func (s *pluginSession) configure(ctx context.Context, trustDomain, hcl string) error {
	request := &configv1.ConfigureRequest{
		CoreConfiguration: &configv1.CoreConfiguration{TrustDomain: trustDomain},
		HclConfiguration:  hcl,
	}
	if _, err := configv1.NewConfigClient(s.conn).Configure(ctx, request); err != nil {
		return fmt.Errorf("Config/Configure for trust domain %q failed: %w", trustDomain, err)
	}
	return nil
}

// deinit calls Init/Deinit and returns "ok" or "unimplemented". SPIRE accepts both.
func (s *pluginSession) deinit(ctx context.Context) (string, error) {
	callCtx, cancel := context.WithTimeout(ctx, deinitTimeout)
	defer cancel()

	_, err := initv1.NewInitClient(s.conn).Deinit(callCtx, &initv1.DeinitRequest{})
	switch {
	case err == nil:
		return "ok", nil
	case status.Code(err) == codes.Unimplemented:
		return "unimplemented", nil
	default:
		return "", fmt.Errorf("Init/Deinit failed: %w", err)
	}
}

func containsString(values []string, wanted string) bool {
	for _, value := range values {
		if value == wanted {
			return true
		}
	}
	return false
}
